"""A Flower start that does not grow with N (#34): under client sampling the
server identifies a node (``query.identify``) when its partition is first
sampled, not all N nodes before round 1, and keeps every guarantee of the
identify step: a wrong device is refused before any training, a partition
is bound at first contact, a squatter is refused, a node is caught up from
the replica it holds. The strategy and the real ClientApp handlers are wired
together in-process (no Ray), with node ids whose order says nothing about
the partitions."""
import logging
import random

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from regtopk_fl.settings import to_run_config

N, M = 40, 4


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Message() needs the process's task identity (Flower sets it in its processes)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 9)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


class _Federation:
    """N ClientApps (node id -> partition shuffled) and the strategy; counts
    every query it is asked to deliver."""

    def __init__(self, make_cfg, n=N, m=M, hint=True, expect=None, extra=(), state_dirs=None,
                 last_round=None):
        from regtopk_fl.fedround import Coordinator, FedServer
        from regtopk_fl.participation import from_cfg
        from regtopk_fl.runner import build
        from strategies.sparse_strategy import SparseAggregation

        cfg = make_cfg(["task=linreg", f"num_workers={n}", "task.dim=30",
                        "task.samples_per_worker=20", "sparsifier=regtopk",
                        "sparsifier.sparsity=0.1", "runtime=flower", "device=cpu",
                        f"participation.clients_per_round={m}", *extra])
        self.cfg, self.run_config = cfg, to_run_config(cfg)
        task, _ = build(cfg)
        self.server = FedServer(task.init_params(), None, lr=cfg.lr)
        coord = Coordinator(self.server, "gradient", verify=True)
        coord.start(range(n))
        ids = random.Random(3).sample(range(10**6, 10**7), n)  # sorted ids: shuffled partitions
        self.table = dict(zip(ids, range(n)))  # node -> partition, as Flower registers them
        self.state_dirs = state_dirs or {}
        self.contexts = {node: self.context(node, p) for node, p in self.table.items()}
        self.strategy = SparseAggregation(coord, n, wait_for_nodes_s=0,
                                          participation=from_cfg(cfg, task.num_examples()),
                                          expect_device=expect,
                                          device_setting="runtime.client_gpus=0.0",
                                          node_hint=self.table if hint else None,
                                          last_round=last_round)
        # asked: (kind, node) of every query; ahead: the identify queries that
        # went out with a round's train messages; lost: nodes whose answer to
        # those never comes back
        self.rows, self.asked, self.trained, self.ahead, self.lost = [], [], [], [], set()
        self.strategy.on_round = lambda _t, info: self.rows.append(info)

    def context(self, node, partition):
        extra = {"state-dir": self.state_dirs[partition]} if partition in self.state_dirs else {}
        return Context(run_id=9, node_id=node, node_config={
            "partition-id": partition, "num-partitions": len(self.table), **extra},
            state=RecordDict(), run_config=dict(self.run_config))

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from clients.client_app import handle_checkpoint, handle_identify

        out = []
        for m in messages:
            kind = m.metadata.message_type.rsplit(".", 1)[-1]
            assert kind in ("identify", "checkpoint"), kind
            self.asked.append((kind, m.metadata.dst_node_id))
            handler = handle_identify if kind == "identify" else handle_checkpoint
            out.append(handler(m, self.contexts[m.metadata.dst_node_id]))
        return out

    def round(self, t):
        """One round as Flower's loop runs it: configure_train's messages (the
        train messages and the identify queries sent ahead) delivered, every
        reply to aggregate_train; returns the train messages."""
        from clients.client_app import handle_identify, handle_train

        msgs = self.strategy.configure_train(t, ArrayRecord(), ConfigRecord(), self)
        train = [m for m in msgs if m.metadata.message_type == MessageType.TRAIN]
        ahead = [m for m in msgs if m.metadata.message_type == f"{MessageType.QUERY}.identify"]
        assert len(train) + len(ahead) == len(msgs)
        self.trained.extend(m.metadata.dst_node_id for m in train)
        self.ahead.extend(m.metadata.dst_node_id for m in ahead)
        self.asked.extend(("identify", m.metadata.dst_node_id) for m in ahead)
        replies = [handle_train(m, self.contexts[m.metadata.dst_node_id]) for m in train]
        replies += [handle_identify(m, self.contexts[m.metadata.dst_node_id]) for m in ahead
                    if m.metadata.dst_node_id not in self.lost]
        self.strategy.aggregate_train(t, replies)
        return train

    def identified(self, kind="identify"):
        return [n for k, n in self.asked if k == kind]

    def asked_at_start(self):
        """The identify queries a round's start waited for (not sent ahead)."""
        ahead = list(self.ahead)
        out = []
        for n in self.identified():
            if n in ahead:
                ahead.remove(n)
            else:
                out.append(n)
        return out


class _Fixed:
    """A participation that samples the same partitions every round."""

    full = False

    def __init__(self, partitions):
        self.partitions = list(partitions)

    def clients(self, t):
        return self.partitions


def test_round_1_identifies_the_sampled_nodes_only(make_cfg):
    """m identify queries before round 1, not N: the nodes of the sampled
    partitions (found through the Simulation Runtime's table), each bound to
    the partition it claims and sent its train message."""
    from regtopk_fl.participation import sample_clients

    fed = _Federation(make_cfg, last_round=5)
    msgs = fed.round(1)
    chosen = set(sample_clients(N, M, 0, 1))
    assert sorted(fed.table[n] for n in fed.asked_at_start()) == sorted(chosen)
    assert len(fed.asked_at_start()) == M < N
    assert {fed.strategy.node_worker[m.metadata.dst_node_id] for m in msgs} == chosen
    seen = set(chosen)
    for t in range(2, 6):  # round t's new nodes were asked with round t-1's messages
        new = set(sample_clients(N, M, 0, t)) - seen
        assert sorted(fed.table[n] for n in fed.ahead[-len(new):] if new) == sorted(new)
        seen |= new
        fed.round(t)
    assert len(fed.asked_at_start()) == M  # only round 1's start waited for answers
    assert len(fed.identified()) == len(seen) < N
    assert len(set(fed.identified())) == len(fed.identified())  # nobody asked twice
    assert all(fed.strategy.node_worker[n] == fed.table[n] for n in fed.identified())


def test_the_next_rounds_nodes_are_asked_with_this_rounds_messages(make_cfg):
    """Round t's train messages carry identify queries for round t+1's
    unbound sampled nodes; their answers are bound after round t's step, so
    round t+1 starts without an identify round trip of its own (#34). None
    go out with the last round. A node whose answer does not come back is
    asked at round t+1's start, as without the queries ahead; the model and
    the bytes are those of a run that asks every node at its round's start
    (no directory, batches of m)."""
    from regtopk_fl.participation import sample_clients

    fed = _Federation(make_cfg, last_round=4)
    fed.round(1)
    late = next(n for n in fed.table if fed.table[n] in set(sample_clients(N, M, 0, 3))
                - set(sample_clients(N, M, 0, 1)) - set(sample_clients(N, M, 0, 2)))
    fed.lost.add(late)  # its answer to the query ahead is lost
    for t in (2, 3, 4):
        start = len(fed.asked_at_start())
        fed.round(t)
        assert set(sample_clients(N, M, 0, t)) <= set(fed.strategy.node_worker.values())
        assert fed.asked_at_start()[start:] == ([late] if t == 3 else [])
    assert fed.ahead.count(late) == 1 and fed.strategy.node_worker[late] == fed.table[late]
    assert not [m for m in fed.strategy.configure_train(5, ArrayRecord(), ConfigRecord(), fed)
                if m.metadata.message_type != MessageType.TRAIN]  # after the last round
    ref = _Federation(make_cfg, hint=False)
    for t in (1, 2, 3, 4):
        ref.round(t)
    assert not ref.ahead
    assert torch.equal(fed.server.params, ref.server.params)
    assert [r["plan"].coded for r in fed.rows] == [r["plan"].coded for r in ref.rows]
    assert [r["replies"] for r in fed.rows] == [M] * 4  # answers ahead are not train replies


def test_without_the_table_nodes_are_found_in_batches_of_the_rounds_size(make_cfg):
    """No directory (a deployment without pinned keys): the server asks the
    unbound nodes in batches of m until every sampled partition is placed;
    each node is asked once, and the round trains exactly the sampled ones."""
    from regtopk_fl.participation import sample_clients

    fed = _Federation(make_cfg, hint=False)
    msgs = fed.round(1)
    asked = fed.identified()
    assert len(asked) % M == 0 or len(asked) == N  # whole batches
    assert len(set(asked)) == len(asked)
    assert {fed.strategy.node_worker[m.metadata.dst_node_id] for m in msgs} == set(
        sample_clients(N, M, 0, 1))
    # and the same model as with the table: who is asked first changes nothing
    ref = _Federation(make_cfg)
    for t in range(2, 6):
        fed.round(t)
    for t in range(1, 6):
        ref.round(t)
    assert torch.equal(fed.server.params, ref.server.params)
    assert [r["plan"].coded for r in fed.rows] == [r["plan"].coded for r in ref.rows]


def test_a_wrong_device_is_refused_before_any_training(make_cfg, monkeypatch):
    """The round-1 batch answers with another device: the run stops in
    configure_train of round 1 (DeviceMismatch), nothing bound, no train
    message made."""
    from strategies.devices import DeviceMismatch

    fed = _Federation(make_cfg, expect="cuda")
    with pytest.raises(DeviceMismatch, match="computes on cpu, but this run's device is cuda"):
        fed.round(1)
    assert fed.trained == [] and fed.strategy.node_worker == {}
    assert 0 < len(fed.identified()) <= M


def test_a_node_is_bound_at_first_contact_and_a_squatter_is_refused(make_cfg, caplog):
    """A node that claims a partition another node already holds is refused
    and counted (trust on first use), never sent the model, and the rightful
    node keeps its partition; a sampled partition whose node lied is still
    trained by its holder."""
    fed = _Federation(make_cfg, last_round=2)  # round 2 asks nobody ahead
    fed.round(1)
    bound = dict(fed.strategy.node_worker)
    victim_node, victim = next(iter(bound.items()))
    squatter = next(n for n in fed.table if n not in bound)
    fed.contexts[squatter].node_config["partition-id"] = victim  # it lies from now on
    partition = fed.table[squatter]
    fed.strategy.participation = _Fixed([partition, victim])  # both sampled
    caplog.set_level(logging.WARNING)
    msgs = fed.round(2)
    assert squatter in fed.identified() and squatter not in fed.strategy.node_worker
    assert fed.strategy.node_worker[victim_node] == victim
    assert fed.strategy.identity.conflicts == 1
    assert f"node {squatter} not identified: claims partition {victim}" in caplog.text
    assert {m.metadata.dst_node_id for m in msgs} == {victim_node}  # the squatter gets nothing
    assert fed.rows[-1]["missing"] == 1  # its own partition had no node that said so


def test_a_node_is_caught_up_from_the_replica_it_holds(make_cfg, tmp_path):
    """A node first identified late, after a restart of its state (a state
    dir holding a replica of round 1 from an earlier life of this run), is
    patched from round 1, as its identify answer says (checked against the
    digest table), not from model_0."""
    from clients.node_state import load_replica, save_replica

    fed = _Federation(make_cfg, state_dirs={p: str(tmp_path / f"s{p}") for p in range(N)})
    for t in (1, 2, 3):
        fed.round(t)
    # a node that computed on model_1 (round 2) and sat round 3 out: replica of round 1
    old = next(n for n in fed.strategy.node_worker
               if getattr(load_replica(fed.contexts[n], fed.cfg), "round", None) == 1)
    p = fed.strategy.node_worker[old]
    replica = load_replica(fed.contexts[old], fed.cfg)
    # the node comes back under a new id: the server has never identified it
    del fed.contexts[old]
    fed.strategy.identity.node_partition.pop(old)
    new = 99
    fed.table[new] = p
    fed.contexts[new] = fed.context(new, p)
    save_replica(fed.contexts[new], replica, fed.cfg)
    fed.strategy.participation = _Fixed([p])
    fed.round(4)
    plan = fed.rows[-1]["plan"]
    assert new in fed.identified() and fed.strategy.node_worker[new] == p
    assert plan.kind_list == ["patch"] and plan.base_list == [1]  # not from model_0
    assert not fed.rows[-1]["outcome"].rejected  # its reply was computed on the server's model


def test_one_info_line_per_round_and_the_detail_at_debug(make_cfg, caplog):
    caplog.set_level(logging.DEBUG, logger="strategies.sparse_strategy")
    fed = _Federation(make_cfg)
    for t in (1, 2):
        fed.round(t)
    info = [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and "new node" in r.getMessage()]
    assert info[0] == f"round 1: {M} new nodes patched from model_0"
    # one line per batch: round 1's start, and the answers sent ahead with
    # round 1 (for round 2) and round 2 (for round 3)
    assert [i.split(":")[0] for i in info] == ["round 1", "round 2", "round 3"]
    detail = [r for r in caplog.records if "no replica: patched from model_0" in r.getMessage()]
    assert len(detail) == len(fed.identified()) and {r.levelno for r in detail} == {logging.DEBUG}


def test_a_checkpoint_identifies_the_rest_first(make_cfg):
    """A checkpoint asks every node for its memory; the nodes not identified
    yet are identified first, so every memory is placed."""
    fed = _Federation(make_cfg)
    fed.round(1)
    fed.strategy.checkpointer = type("Ckpt", (), {"due": lambda self, t: True})()
    msgs = fed.strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), fed)
    assert len(msgs) == N and len(set(fed.identified())) == N
    assert fed.strategy.node_worker == fed.table
